"""Real-data converters: each source is a small Ray-free module whose `parse(...)` returns a `ParseResult`
(records in evaluation order + quarantined rejects); `shards.process_shard` checks images and writes one Parquet
shard; `ccr_ray.data.ingest` runs the shards in parallel on Ray Data; `jobs/prepare_data.py` is the CLI.

    seeds      the MLA/DASD path JSON + caption JSON + .npy split layout (spec 4.4), k-fold name lists -> fold
    cc300k     UC2 translated CC3M TSVs -> the seeds' CC300K selection
    multi30k   Multi30K raw text files (task1 translations, task2 descriptions)
    xtd10      XTD10 caption files parallel to test_image_names.txt
    xflickrco  IGLUE xFlickr&CO JSON lines
    coco-cn    COCO-CN sentence files
"""

SOURCES = ("seeds", "cc300k", "multi30k", "xtd10", "xflickrco", "coco-cn")
