"""Placement executors: growth applied where the training state lives, never gathering the model.

* ``zero``           ZeRO-1/2/3 partitions, sparse (fixed) plans: exact per-rank exchange of old elements
                     (``zero_index``: pure index math; ``zero_shm``: same-host shared-memory transport)
* ``zero_dense``     ZeRO partitions, dense maps (LiGO): per-rank partial products, reduce-scattered
* ``zero_universal`` offline growth of DeepSpeed checkpoints through the universal format
* ``zero_memory``    tensor accounting used by the memory tests and benchmarks
* ``host_copy``      large host copies at libc ``memcpy`` speed (the refresh of low-precision weights)
* ``tensor_parallel``  Megatron-core column/row-parallel shards
"""
