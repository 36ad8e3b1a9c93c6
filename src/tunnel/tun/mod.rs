//! TUN capture (client `tun.enable`, issue 11): [`wire`] checks and rewrites the IP packets the
//! device hands over, [`nat`] maps each captured TCP flow to the local listener that terminates
//! it ("system stack": the kernel's TCP, no userspace TCP stack). The device, routes and the
//! driver in the client loop come next; nothing here is wired yet.

pub mod nat;
pub mod wire;
