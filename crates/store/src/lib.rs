//! Nix store primitives shared by the Thymis controller, agent and imager.
//!
//! Everything here speaks Nix's own formats so that real Nix tools accept what we
//! produce and we accept what they produce: NAR archives ([`nar`]), the nix-base32
//! alphabet ([`base32`]), NAR hashes ([`hash`]), store paths ([`store_path`]),
//! path info and closures ([`path_info`], [`closure`]), the ed25519 signature scheme
//! of binary caches ([`signing`]), registration into a local store with only stock
//! commands ([`local_store`]), zstd limits for untrusted streams ([`zstd_limits`]) and
//! the offline update bundle ([`bundle`]).

pub mod base32;
pub mod bundle;
pub mod closure;
pub mod hash;
pub mod local_store;
pub mod nar;
pub mod narinfo;
pub mod path_info;
pub mod sealed;
pub mod signing;
pub mod store_path;
pub mod system;
pub mod zstd_limits;

pub use hash::NarHash;
pub use path_info::PathInfo;
pub use store_path::StorePath;
