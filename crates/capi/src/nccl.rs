//! `ncclEpCreateGroup` from a real `ncclComm_t`: NCCL is loaded at run time (no link-time
//! dependency), asked for the rank, the rank count and the GPU, and used once to share rank
//! 0's bootstrap id; the group then runs on moe-ep's own bootstrap.
use crate::error::{Failure, Result};
use crate::sys::{ncclComm_t, ncclResult_t, ncclSuccess, ncclUint8};
use moe_ep::bootstrap::{TcpBootstrap, UNIQUE_ID_BYTES, UniqueId, default_timeout};
use moe_ep::{Device, Group};
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

type RankFn = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> ncclResult_t;
type AllGatherFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, ncclComm_t, *mut c_void) -> ncclResult_t;
type ErrorStringFn = unsafe extern "C" fn(ncclResult_t) -> *const c_char;

/// The NCCL functions used here.
struct Nccl {
    comm_user_rank: RankFn,
    comm_count: RankFn,
    comm_cu_device: RankFn,
    all_gather: AllGatherFn,
    error_string: ErrorStringFn,
}

/// Library names tried in order (`MOE_EP_NCCL_LIBRARY` first when set).
fn candidates() -> Vec<String> {
    let mut names: Vec<String> = std::env::var("MOE_EP_NCCL_LIBRARY").into_iter().collect();
    names.extend(["libnccl.so.2", "libnccl.so"].map(String::from));
    names
}

fn load() -> std::result::Result<Nccl, String> {
    let mut tried = Vec::new();
    for name in candidates() {
        let Ok(c_name) = std::ffi::CString::new(name.clone()) else { continue };
        // SAFETY: dlopen of a library name; the handle is kept for the process.
        let lib = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if lib.is_null() {
            tried.push(name);
            continue;
        }
        let sym = |s: &CStr| -> std::result::Result<*mut c_void, String> {
            // SAFETY: a symbol lookup in a live handle.
            let p = unsafe { libc::dlsym(lib, s.as_ptr()) };
            if p.is_null() { Err(format!("{name} has no {}", s.to_string_lossy())) } else { Ok(p) }
        };
        // SAFETY: NCCL's documented signatures (nccl.h) for these symbols.
        return unsafe {
            Ok(Nccl {
                comm_user_rank: std::mem::transmute::<*mut c_void, RankFn>(sym(c"ncclCommUserRank")?),
                comm_count: std::mem::transmute::<*mut c_void, RankFn>(sym(c"ncclCommCount")?),
                comm_cu_device: std::mem::transmute::<*mut c_void, RankFn>(sym(c"ncclCommCuDevice")?),
                all_gather: std::mem::transmute::<*mut c_void, AllGatherFn>(sym(c"ncclAllGather")?),
                error_string: std::mem::transmute::<*mut c_void, ErrorStringFn>(sym(c"ncclGetErrorString")?),
            })
        };
    }
    Err(format!("NCCL could not be loaded (tried {}; set MOE_EP_NCCL_LIBRARY to its path)", tried.join(", ")))
}

fn nccl() -> Result<&'static Nccl> {
    static NCCL: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();
    NCCL.get_or_init(load).as_ref().map_err(|e| Failure::system(e.clone()))
}

impl Nccl {
    fn check(&self, call: &str, r: ncclResult_t) -> Result<()> {
        if r == ncclSuccess {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for any code.
        let text = unsafe { CStr::from_ptr((self.error_string)(r)) }.to_string_lossy().into_owned();
        Err(Failure { code: r, message: format!("{call}: {text}") })
    }

    fn query(&self, call: &str, f: RankFn, comm: ncclComm_t) -> Result<usize> {
        let mut v: c_int = -1;
        // SAFETY: `comm` is the caller's communicator; `v` is a valid out-pointer.
        self.check(call, unsafe { f(comm, &mut v) })?;
        usize::try_from(v).map_err(|_| Failure::system(format!("{call} returned {v}")))
    }
}

/// Collective over `comm`: this rank's [`Group`], on the communicator's GPU.
///
/// # Safety
/// `comm` is a live NCCL communicator, used by no other thread during the call.
pub unsafe fn group_from_comm(comm: ncclComm_t) -> Result<Group> {
    if comm.is_null() {
        return Err(Failure::invalid("comm is NULL"));
    }
    let n = nccl()?;
    let rank = n.query("ncclCommUserRank", n.comm_user_rank, comm)?;
    let num_ranks = n.query("ncclCommCount", n.comm_count, comm)?;
    let gpu = n.query("ncclCommCuDevice", n.comm_cu_device, comm)?;
    let device = Device::cuda(gpu)?;
    // Rank 0's id reaches every rank through one all-gather of UNIQUE_ID_BYTES per rank.
    let id = if rank == 0 { UniqueId::new()?.to_bytes() } else { [0u8; UNIQUE_ID_BYTES] };
    let stream = device.new_stream()?;
    let send = device.alloc(UNIQUE_ID_BYTES)?;
    let recv = device.alloc(UNIQUE_ID_BYTES * num_ranks)?;
    send.write(&stream, 0, &id)?;
    stream.synchronize()?;
    // SAFETY: device buffers of the communicator's GPU sized for the call; the stream is ours.
    let r = unsafe {
        (n.all_gather)(
            send.ptr() as *const c_void,
            recv.ptr() as *mut c_void,
            UNIQUE_ID_BYTES,
            ncclUint8,
            comm,
            stream.raw() as *mut c_void,
        )
    };
    n.check("ncclAllGather", r)?;
    let all: Vec<u8> = recv.to_vec(&stream)?;
    let id = UniqueId::from_bytes(&all[..UNIQUE_ID_BYTES])?;
    let bootstrap = TcpBootstrap::new(&id, rank, num_ranks, default_timeout())?;
    Ok(Group::new(device, Box::new(bootstrap))?)
}
