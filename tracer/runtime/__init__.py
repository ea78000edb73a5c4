"""The rank runtime: TensorParallelModel runs every rank's shard of a saved model through one
executor interface (rank threads, rank processes, or one torchrun rank); the C++ collectives the
graphs call live here too. Reads the artifact format; knows nothing of tracing or TorchServe."""
