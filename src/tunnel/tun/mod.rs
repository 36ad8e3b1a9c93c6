//! TUN capture (client `tun.enable`, issue 11): [`wire`] checks and rewrites the IP packets the
//! device hands over, [`nat`] maps each captured TCP flow to the local listener that terminates
//! it ("system stack": the kernel's TCP, no userspace TCP stack), [`netlink`] builds the
//! rtnetlink requests and [`device`] creates the interface and its policy routing (Linux);
//! [`front`] decides each packet's fate (reflect TCP, UDP flows to tunnel datagrams, DNS to
//! `tun.dns`). The driver is the client loop's `tun_mode` child module.

#[cfg(target_os = "linux")]
pub mod device;
pub mod front;
pub mod nat;
pub mod netlink;
pub mod wire;
