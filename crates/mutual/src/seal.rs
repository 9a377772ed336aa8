//! Client-side encryption and archives for the data plane (to be written).
