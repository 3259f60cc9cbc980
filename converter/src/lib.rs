//! naiad-converter
