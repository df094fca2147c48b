//! The control plane through its router (being written).
