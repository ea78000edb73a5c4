"""STAND-IN for torch_neuronx (there is no Neuron hardware here): its presence alone switches tpserve
to the neuronx_distributed backend in tests."""
