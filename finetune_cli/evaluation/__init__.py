"""`ftune eval` (evaluate.run, evaluate.run_generate): perplexity, pair metrics, and generated
answers scored; training's eval uses the same functions.
"""
