//! moe-ep's kernels, written once in Rust.
//!
//! * On `nvptx64-nvidia-cuda` the crate is `no_std`, every kernel is an
//!   `extern "ptx-kernel"` entry point, and [`dev`] is inline PTX (`dev/ptx.rs`).
//!   `cargo xtask ptx` turns it into the PTX the host crate embeds.
//! * On any other target the same kernel bodies are plain functions and [`dev`] is a CPU
//!   emulator (`dev/emu.rs`): every block of a launch runs concurrently on OS threads, so
//!   kernels that wait on other blocks or other ranks run unchanged in CI.
//!
//! Rules that keep the PTX free of `.extern .func` (CI checks): raw pointers instead of
//! bounds-checked slices, wrapping arithmetic, no unwrap/fmt, no division by a value the
//! compiler cannot prove non-zero, `#[inline(always)]` on helpers. All cross-thread and
//! cross-GPU synchronisation goes through `dev`'s named primitives: Rust's core atomics are
//! under-fenced on nvptx (`fetch_add(Release)` emits a relaxed `atom`).
#![cfg_attr(target_arch = "nvptx64", no_std)]
#![cfg_attr(target_arch = "nvptx64", feature(abi_ptx, stdarch_nvptx, asm_experimental_arch))]
#![deny(missing_docs)]

pub use moe_ep_abi as abi;

/// A kernel as the host sees it: its PTX entry name and, off the GPU, the same body as a
/// plain function for the emulator.
#[cfg(not(target_arch = "nvptx64"))]
pub struct Kernel<P: 'static> {
    /// The kernel's name (in errors and docs).
    pub name: &'static str,
    /// Its entry in the PTX module: the name, or for the dispatch/combine kernels an
    /// Itanium-mangled `moe_ep::<mode>::<op>()`, which profilers demangle, so that tools
    /// written for DeepEP (`'::dispatch' in kernel_name`) find them.
    pub symbol: &'static str,
    /// The kernel body, called once per emulated thread.
    pub cpu: unsafe fn(P),
}

/// Declares a kernel taking one parameter struct by value:
/// `extern "ptx-kernel"` + `#[no_mangle]` on the GPU; a plain `unsafe fn` plus a
/// [`Kernel`] descriptor constant elsewhere.
macro_rules! kernel {
    ($(#[$m:meta])* pub unsafe fn $name:ident($p:ident: $ty:ty) as $desc:ident $body:block) => {
        kernel! { $(#[$m])* pub unsafe fn $name($p: $ty) as $desc = stringify!($name), $body }
    };
    ($(#[$m:meta])* pub unsafe fn $name:ident($p:ident: $ty:ty) as $desc:ident = $sym:expr, $body:block) => {
        #[cfg(target_arch = "nvptx64")]
        #[unsafe(export_name = $sym)]
        $(#[$m])*
        pub unsafe extern "ptx-kernel" fn $name($p: $ty) $body

        #[cfg(not(target_arch = "nvptx64"))]
        $(#[$m])*
        ///
        /// # Safety
        /// Launch contract of a CUDA kernel: run it through `dev::launch` with pointers that are
        /// valid for the accesses the parameters describe.
        pub unsafe fn $name($p: $ty) $body

        #[cfg(not(target_arch = "nvptx64"))]
        #[doc = concat!("Descriptor of [`", stringify!($name), "`].")]
        pub const $desc: $crate::Kernel<$ty> = $crate::Kernel { name: stringify!($name), symbol: $sym, cpu: $name };
    };
}

pub mod collective;
pub mod copy;
pub mod dev;
pub mod expert_major;
pub mod intranode;
pub mod layout;
pub mod low_latency;
pub mod net;
pub mod num;
pub mod selftest;

#[cfg(target_arch = "nvptx64")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // Unreachable when the PTX is clean (no `.extern .func`); `trap` aborts the kernel.
    unsafe { core::arch::nvptx::trap() }
}
