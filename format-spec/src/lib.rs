//! naiad-format
