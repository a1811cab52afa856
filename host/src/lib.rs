//! moe-ep: Mixture-of-Experts expert-parallel communication.
#![deny(missing_docs)]

pub mod bootstrap;
mod error;
pub mod reference;

pub use error::{Error, Result};
