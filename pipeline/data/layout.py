"""Where the data lies: the raw folder's image folder, and the names inside the prepared folder.

The raw folder holds the NIH layout: `images/*.png` beside the label CSV and the two list files
(`pipeline.classes` names those); the images may also be DICOM files (`.dcm`, `.dicom`) that the
label CSV names. The prepared folder:

    manifest.csv            image, patient, followup, view, sex (M/F/empty), age (years/empty), split,
                            the 14 classes (0/1), cache_index, width and height (the file's own size in pixels)
    split_stats.json        images/patients/positives per split, quarantine and inventory counts
    class_counts.json       training-split positives per class (the loss's category weights)
    split_class_counts.csv  split, class, count, prevalence (long format, for a bar plot)
    quarantine.csv          image, reason, detail for every file that would not decode
    boxes.json              the raw folder's BBox_List_2017.csv (when present) for the manifest's
                            images, in pixels of the cached images; `source` null when absent
    cache/                  images_<size>.u8 + index.json (see `pipeline.data.cache`)

`pipeline.data.prepare` writes them; the dataset, training, evaluation and registration read them.
The prepare component builds the cache in a work folder beside the prepared folder
(`data/prepared-work/cache`, kept between runs so a build resumes) and publishes it into `cache/`.
"""

from __future__ import annotations

RAW_IMAGES = "images"  # in the raw folder: every image, flat
RAW_SUFFIXES = (".png", ".dcm", ".dicom")  # the images a raw folder may hold (lower case)
MANIFEST = "manifest.csv"
SPLIT_STATS = "split_stats.json"
CLASS_COUNTS = "class_counts.json"
SPLIT_CLASS_COUNTS = "split_class_counts.csv"
QUARANTINE = "quarantine.csv"
BOXES = "boxes.json"
CACHE_DIR = "cache"
CACHE_INDEX = "index.json"  # inside CACHE_DIR: size, count, file order, fingerprint, completeness
