//! The IPC side: what IDE clients speak (ipc-protocol.md) and one client's connection.
//!
//! [`frame`] is the wire codec, [`connection`] the per-client state machine over it,
//! [`payload`] validates task payloads, [`capabilities`] builds the capabilities reply and
//! [`error`] the error codes and error frames.

pub mod capabilities;
pub mod connection;
pub mod error;
pub mod frame;
pub mod payload;
