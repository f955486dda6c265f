// megacpm._C: C++ helpers for the data pipeline.
//
// build_sample_idx is Megatron-LM's GPT sample index: documents are concatenated in doc_order
// into one token stream, and sample j covers stream positions [j*seq_len, j*seq_len + seq_len]
// (seq_len + 1 tokens: inputs plus the next-token targets, so consecutive samples share one
// token). Row j of the result is (position in doc_order, offset within that document) of
// sample j's first token; row num_samples marks the last token of the last sample.
//
// megacpm/data/sample_index.py holds the numpy reference this must agree with.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using LengthArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using OrderArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// Validates every input while the GIL is held, so the loop below cannot read out of bounds
// and the error reaches Python as a ValueError. Returns the total token count.
int64_t check_inputs(const LengthArray& doc_lengths, const OrderArray& doc_order, int64_t seq_len) {
    if (doc_lengths.ndim() != 1 || doc_order.ndim() != 1) {
        throw std::invalid_argument("build_sample_idx: doc_lengths and doc_order must be 1-D");
    }
    if (seq_len < 1) {
        throw std::invalid_argument("build_sample_idx: seq_len must be >= 1, got " + std::to_string(seq_len));
    }
    const int32_t* lengths = doc_lengths.data();
    const int64_t* order = doc_order.data();
    const int64_t num_docs = doc_lengths.shape(0);
    int64_t total_tokens = 0;
    for (int64_t i = 0; i < doc_order.shape(0); ++i) {
        if (order[i] < 0 || order[i] >= num_docs) {
            throw std::invalid_argument("build_sample_idx: doc_order[" + std::to_string(i) + "] = " +
                                        std::to_string(order[i]) + " is not a document index");
        }
        if (lengths[order[i]] < 0) {
            throw std::invalid_argument("build_sample_idx: negative document length");
        }
        total_tokens += lengths[order[i]];
    }
    return total_tokens;
}

// Walks the documents once, carrying each sample's seq_len + 1 tokens across document
// boundaries. Every row names the document that holds the token (never an empty one). Requires
// num_samples >= 1, so that such a document exists. Plain C++ on raw pointers: runs without the GIL.
void fill_sample_idx(const int32_t* lengths, const int64_t* order, int64_t seq_len,
                     int64_t num_samples, int64_t* out) {
    int64_t doc_pos = 0;     // position in doc_order of the current document
    int64_t doc_offset = 0;  // offset of the current sample's first token within that document
    for (int64_t sample = 0; sample <= num_samples; ++sample) {
        // Sample 0 starts at stream position 0 (after any empty documents); every later one
        // starts seq_len tokens on, at the previous sample's last token.
        int64_t remaining = sample == 0 ? 0 : seq_len;
        while (true) {
            const int64_t left_in_doc = static_cast<int64_t>(lengths[order[doc_pos]]) - doc_offset;
            if (remaining < left_in_doc) {
                doc_offset += remaining;
                break;
            }
            remaining -= left_in_doc;
            ++doc_pos;
            doc_offset = 0;
        }
        out[2 * sample] = doc_pos;
        out[2 * sample + 1] = doc_offset;
    }
}

py::array_t<int64_t> build_sample_idx(const LengthArray& doc_lengths, const OrderArray& doc_order,
                                      int64_t seq_len) {
    const int64_t total_tokens = check_inputs(doc_lengths, doc_order, seq_len);
    const int64_t num_samples = total_tokens > 0 ? (total_tokens - 1) / seq_len : 0;
    py::array_t<int64_t> result({num_samples + 1, static_cast<int64_t>(2)});
    int64_t* out = result.mutable_data();
    const int32_t* lengths = doc_lengths.data();
    const int64_t* order = doc_order.data();
    if (num_samples == 0) {  // nothing to locate: one row pointing at the start
        out[0] = 0;
        out[1] = 0;
    } else {
        py::gil_scoped_release release;
        fill_sample_idx(lengths, order, seq_len, num_samples, out);
    }
    return result;
}

// Blending: the quota method of Balinski and Young (1975). Sample n (a "house" of n + 1 seats) goes,
// among the datasets still below their share weights[i] * (n + 1), to the one with the largest
// weights[i] / (taken[i] + 1) (the first on ties). Every prefix then satisfies quota: each dataset
// has taken floor or ceil of weights[i] * length, never a whole sample off; and the choice for a
// prefix never depends on `size`.
void fill_blending(const double* weights, int64_t num_datasets, int64_t size, int16_t* dataset_index,
                   int64_t* dataset_sample_index) {
    std::vector<int64_t> taken(num_datasets, 0);
    for (int64_t n = 0; n < size; ++n) {
        const double seats = static_cast<double>(n + 1);
        int64_t best = -1;
        double best_priority = -1.0;
        for (int64_t i = 0; i < num_datasets; ++i) {
            if (static_cast<double>(taken[i]) >= weights[i] * seats) {
                continue;  // at its upper quota already
            }
            const double priority = weights[i] / static_cast<double>(taken[i] + 1);
            if (priority > best_priority) {
                best = i;
                best_priority = priority;
            }
        }
        dataset_index[n] = static_cast<int16_t>(best);
        dataset_sample_index[n] = taken[best]++;
    }
}

py::tuple build_blending_indices(const py::array_t<double, py::array::c_style | py::array::forcecast>& weights,
                                 int64_t size) {
    if (weights.ndim() != 1 || weights.shape(0) < 1 || weights.shape(0) > 32767) {
        throw std::invalid_argument("build_blending_indices: weights must be 1-D with 1 to 32767 entries");
    }
    if (size < 0) {
        throw std::invalid_argument("build_blending_indices: size must be >= 0");
    }
    const int64_t num_datasets = weights.shape(0);
    py::array_t<int16_t> dataset_index(size);
    py::array_t<int64_t> dataset_sample_index(size);
    const double* w = weights.data();
    int16_t* index_out = dataset_index.mutable_data();
    int64_t* sample_out = dataset_sample_index.mutable_data();
    {
        py::gil_scoped_release release;
        fill_blending(w, num_datasets, size, index_out, sample_out);
    }
    return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "megacpm C++ helpers (data pipeline)";
    m.def("build_sample_idx", &build_sample_idx, py::arg("doc_lengths"), py::arg("doc_order"),
          py::arg("seq_len"),
          "Megatron GPT sample index: int64 [num_samples + 1, 2] of (position in doc_order, "
          "offset in document) for each sample's first token; num_samples = "
          "(total_tokens - 1) // seq_len.");
    m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
          "Mixture order: (int16 dataset of each sample, int64 index of that sample within its "
          "dataset) for `size` samples; weights must be normalised.");
}
