"""Evaluation: perplexity on a token stream; zero-shot tasks."""
