"""STAND-IN: records the call instead of compiling for Neuron."""


def parallel_model_trace(func, example_inputs, **kwargs):
    return ("neuron", kwargs["tp_degree"], kwargs["compiler_args"])
