"""How attention calls are seen: a torch-function mode (SDPA, eager softmax, MHA, ``emit``) and a
wrapper around Hugging Face's attention registry. Each mechanism produces AttentionEvents."""
