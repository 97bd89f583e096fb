"""Decoding: one reply (`generate`, for generate/chat and training's samples) and many prompts decoded
together step by step (`batching`, for the server).
"""
