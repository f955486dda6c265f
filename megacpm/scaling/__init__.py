"""The wind tunnel and the scaling laws: sweeps of short runs, and the power laws fitted to them."""
