"""In-process engines: model-side serving logic usable without TorchServe (tokenizing, grouping a
batch by bucket, running it). The TorchServe handlers in handler/ wrap them."""
