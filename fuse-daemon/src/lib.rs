//! naiad-fuse
