"""The cptd process: wiring, loops, state, training and evaluation entry points."""
