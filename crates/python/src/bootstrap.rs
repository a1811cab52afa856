//! Bootstraps built from Python: [`PyBootstrap`] (setup exchanges through a Python
//! all-gather callable) and the [`UniqueId`] of a TCP bootstrap.
use crate::array::OrPy;
use moe_ep::Error;
use moe_ep::bootstrap::{Bootstrap, UniqueId as RsUniqueId};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// A bootstrap whose all-gather is a Python callable `bytes -> list[bytes]` (e.g. over
/// `torch.distributed.all_gather_object`).
pub(crate) struct PyBootstrap {
    pub(crate) rank: usize,
    pub(crate) num_ranks: usize,
    pub(crate) all_gather: Py<PyAny>,
}

impl Bootstrap for PyBootstrap {
    fn rank(&self) -> usize {
        self.rank
    }

    fn num_ranks(&self) -> usize {
        self.num_ranks
    }

    fn all_gather(&self, blob: &[u8]) -> moe_ep::Result<Vec<Vec<u8>>> {
        Python::attach(|py| -> PyResult<Vec<Vec<u8>>> {
            let out = self.all_gather.call1(py, (PyBytes::new(py, blob),))?;
            out.bind(py).extract::<Vec<Vec<u8>>>()
        })
        .map_err(|e| Error::Bootstrap(format!("the Python all-gather failed: {e}")))
        .and_then(|blobs| {
            if blobs.len() == self.num_ranks {
                Ok(blobs)
            } else {
                Err(Error::Bootstrap(format!("all-gather returned {} blobs for {} ranks", blobs.len(), self.num_ranks)))
            }
        })
    }
}

/// Bootstrap identity for ranks without torch.distributed (address + secret of rank 0's
/// TCP listener); share its bytes with every rank, then `Rank.with_unique_id`.
#[pyclass(frozen, module = "moe_ep._native")]
pub(crate) struct UniqueId {
    pub(crate) id: RsUniqueId,
}

#[pymethods]
impl UniqueId {
    #[new]
    fn new() -> PyResult<UniqueId> {
        Ok(UniqueId { id: RsUniqueId::new().py()? })
    }

    /// The id as bytes (to send to the other ranks).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.id.to_bytes())
    }

    /// The id from `to_bytes()`'s output.
    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<UniqueId> {
        Ok(UniqueId { id: RsUniqueId::from_bytes(data).py()? })
    }

    fn __repr__(&self) -> String {
        format!("UniqueId({})", self.id)
    }
}
