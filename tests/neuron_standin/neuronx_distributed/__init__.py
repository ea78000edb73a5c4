"""STAND-IN for AWS neuronx_distributed, for tests on machines without Neuron hardware.

It has the real package's module paths, names and signatures and the parts of its behaviour tpserve
relies on: the trace entry point records its call; the parallel layers shard their parameters as
the real ones do (contiguous blocks per rank, marked with tensor_model_parallel / partition_dim /
partition_stride) and compute at tp 1. There are no collectives: at tp > 1 the layers build (to
check the shards) but refuse to run.
"""
