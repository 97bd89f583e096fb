"""`ftune train` (train.run), `ftune validate` / `ftune preview` (validate), and what a run is made of:
the trainer seam with TRL, methods, packed attention, micro-batches, distributed launch.
"""
