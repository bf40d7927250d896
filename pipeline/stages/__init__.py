"""The numbered stages, one module each: s00_unzip, s01_folds, s02_train, s03_oof,
s04_ensemble, s05_submission. Each reads artifacts (pipeline.core.artifacts), calls the library and writes its own."""
