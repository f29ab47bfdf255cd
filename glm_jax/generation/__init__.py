"""Generation: decoding strategies (greedy, temperature/top-k/top-p sampling, GLM-130B beam search)."""
