//! The protobuf codec of the generated services: `tonic_prost`'s, except that a request that
//! does not decode (bad wire format, a string field that is not UTF-8) is the caller's error,
//! `INVALID_ARGUMENT`, not the server's `INTERNAL`.

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

/// [`ProstCodec`] with request decode errors mapped to `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Default)]
pub struct FlywheelCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for FlywheelCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = FlywheelDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        FlywheelDecoder(std::marker::PhantomData)
    }
}

#[derive(Debug, Clone, Default)]
pub struct FlywheelDecoder<U>(std::marker::PhantomData<U>);

impl<U: Message + Default> Decoder for FlywheelDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            let mut message = e.to_string();
            message.truncate(512);
            Status::invalid_argument(format!("request does not decode as protobuf: {message}"))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
