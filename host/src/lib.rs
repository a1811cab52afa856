//! moe-ep: Mixture-of-Experts expert-parallel communication.
//!
//! The README follows (its example is compiled as a doctest).
#![doc = include_str!("../../README.md")]
#![deny(missing_docs)]

pub mod bootstrap;
pub mod buffer;
pub mod collective;
pub mod device;
mod error;
pub mod expert_major;
pub mod group;
pub mod heap;
pub mod intranode;
pub mod layout;
pub mod limits;
pub mod low_latency;
pub mod net;
pub mod reference;

pub use buffer::{Buffer, BufferConfig, CallStream, Output};
pub use device::{Device, DeviceBuffer, ErrorRecord, Event, Graph, HostMapped, LaunchConfig, Stream};
pub use error::{Error, Result};
pub use group::{Group, Sharing, SymmetricBuffer};
pub use moe_ep_kernels as kernels;
