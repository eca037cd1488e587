//! Helpers shared by the integration tests that cross crate and process
//! boundaries (two processes over the local backend, the CLI against the
//! simulated Qubes, conformance vectors, hostile peers).
#![forbid(unsafe_code)]

pub mod doc_refs;
pub mod safety_comments;
