//! The gRPC API of timber, generated from `proto/timber.proto`: messages, tonic clients
//! (`*_client`) and servers (`*_server`). Shared by `timberd` and `timber-client`.

#![allow(missing_docs, clippy::all, missing_debug_implementations)]

/// Version 1 of the API (`package timber.v1`).
pub mod v1 {
    tonic::include_proto!("timber.v1");
}

/// The transport between cluster members (`package timber.raft.v1`): openraft's RPCs.
pub mod raft {
    tonic::include_proto!("timber.raft.v1");
}
