//! From the kernel's ring buffers to [`decode::SocketEvent`]s, in the order they
//! happened: the reader task ([`reader`]) and the decoder ([`decode`]).

pub mod decode;
pub mod merge;
pub mod reader;
