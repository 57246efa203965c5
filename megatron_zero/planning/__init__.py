"""Planning before paying for nodes: per-GPU memory of a run's phases.

    actor_memory.py   the Megatron actor's terms: parameters, model state, activations
    engine_memory.py  an SGLang engine's terms: weights, KV cache, CUDA-graph reserve
    memory.py         the terms put into phases for a deployment (colocated, disaggregated, actor only): the plan
    layouts.py        layouts of the same job that fit
    report.py         the plan as a table
"""
