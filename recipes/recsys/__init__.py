"""Sequential recommendation building blocks used by ``recipes/sequential_recommendation.py``.

One concept per file:

- ``data``: readers (SASRec ``user item`` text, csv/parquet through ``datasets``), validation,
  leave-one-out split, seeded negative sampling, torch datasets and collate functions.
- ``model``: a Hugging Face backbone (GPT-2 causal / BERT bidirectional) fed through ``inputs_embeds``,
  item embeddings tied to the output layer, and the three losses (bce, softmax, sampled_softmax).
- ``metrics``: HR@k and NDCG@k from the target's rank, batched.
- ``synthetic``: a deterministic interaction generator with planted sequential structure.
"""
