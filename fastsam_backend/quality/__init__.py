"""The quality harness: generated scenes with ground truth, Label Studio requests built as a user's
prompts would be, the evaluation behind ``fastsam-backend quality``, and a ground-truth segmenter
for tests of everything around the model. Used by the tests, the benchmarks and the scripts; the
backend itself never imports it.
"""
