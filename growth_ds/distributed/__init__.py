"""Placement executors: growth applied where the training state lives, never gathering the model.

* ``zero``             ZeRO-1/2/3 partitions (a package: ``zero.engine`` grows sparse plans by an exact per-rank
                       exchange of old elements, ``zero.dense`` dense LiGO maps by reduce-scattered partial
                       products, ``zero.universal`` DeepSpeed checkpoints offline)
* ``tensor_parallel``  Megatron-core column/row-parallel shards
* ``engine_state``     DeepSpeed training-state access the executors share with the trainer
* ``host_copy``        large host copies at libc ``memcpy`` speed (the refresh of low-precision weights)

Nothing here imports ``growth_ds.train``, ``growth_ds.interop`` or the command line.
"""
