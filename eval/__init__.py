"""Evaluation of vector codecs: MSE, exact search, recalls, faiss baselines and reports."""
