"""WebDataset tar shards, from disk, HTTP(S) or a `pipe:` command, on every backend but FFCV.

    source    shard URLs, the manifest, opening a shard and reading its samples (webdataset's tar iterator)
    plan      which samples each rank and loader stream reads in an epoch, and in which order (index space)
    reader    a stream's batches from the plan, with bad samples replaced, counted and named
    loaders   the torchvision and torch backends over shards
    dali      the DALI backend over shards (fn.readers.webdataset, or fed from the stream reader)
    factory   the shard loader of each backend, behind pipelines.factory.build_train_loader
    check     `byol-fast check-data` on shards
    convert   `byol-fast convert-shards`: an image folder or list to shards, manifest and DALI indexes
"""
