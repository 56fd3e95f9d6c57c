//! The gRPC codec of Fondation's own services: prost, with small per-call buffers.
//!
//! tonic allocates an encode and a decode buffer for every call, 8 KiB each by default, and keeps
//! them for the call's life. An agent's session is one call that lasts as long as the agent is
//! connected, so the coordinator paid 16 KiB per connected agent for buffers that carry messages
//! of a few hundred bytes (a third of its memory per agent). Larger messages (documents, job
//! listings) still fit: tonic reserves room for a message's full length as it arrives.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// First size of each buffer, and the step it grows by while encoding.
const BUFFER_SIZE: usize = 256;
/// tonic's default: how much a stream batches before it yields.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`tonic_prost::ProstCodec`] with [`BUFFER_SIZE`] buffers; the generated services use it
/// (build.rs, `codec_path`).
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
