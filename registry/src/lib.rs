//! naiad-registry
