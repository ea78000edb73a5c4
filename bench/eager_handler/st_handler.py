"""The baseline: a plain eager sentence-transformers TorchServe handler, as users write it without
tpserve (the whole batch padded to its longest text, no tracing, no tensor parallelism)."""

import json

from ts.torch_handler.base_handler import BaseHandler


class SentenceTransformerHandler(BaseHandler):
    def initialize(self, context):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(context.system_properties["model_dir"], device="cpu")
        self.model.max_seq_length = 128  # the same longest input as tpserve's largest bucket
        self.initialized = True

    def handle(self, data, context):
        texts = []
        for row in data:
            value = row.get("body") or row.get("data")
            texts.append(value.decode() if isinstance(value, (bytes, bytearray)) else str(value))
        return [json.dumps(vector.tolist()) for vector in self.model.encode(texts, batch_size=len(texts))]
