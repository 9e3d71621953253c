"""Raw click logs -> validated frames -> Parquet splits."""
