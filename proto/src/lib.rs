//! The refbus wire contract, generated from `proto/refbus/v1/*.proto`.
//!
//! Everything here is generated code plus the encoded file-descriptor set
//! (for gRPC reflection). Conversions to domain types live in `refbus-core`.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Version 1 of the contract: envelope, payloads, gateway and agency services.
pub mod v1 {
    tonic::include_proto!("refbus.v1");
}

/// The encoded `FileDescriptorSet` of every refbus proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/refbus_descriptor.bin"));
