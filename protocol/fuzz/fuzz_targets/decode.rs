//! Every decoder a peer can reach, on arbitrary bytes: errors are fine, panics are bugs.
#![no_main]

use veil_protocol::codec::decode;
use veil_protocol::wire::{
    DirectoryRequest, DirectoryResponse, InferRequest, InferResponse, UploadRequest,
    UploadResponse,
};
use veil_protocol::SignedAd;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limit = data.len();
    if let Ok(InferRequest::Step { hidden, .. }) = decode::<InferRequest>(data, limit) {
        let _ = hidden.to_f32();
    }
    if let Ok(InferResponse::Hidden { hidden }) = decode::<InferResponse>(data, limit) {
        let _ = hidden.to_f32();
    }
    let _ = decode::<UploadRequest>(data, limit);
    let _ = decode::<UploadResponse>(data, limit);
    let _ = decode::<DirectoryRequest>(data, limit);
    if let Ok(DirectoryResponse::Ads(ads)) = decode::<DirectoryResponse>(data, limit) {
        for ad in ads {
            let _ = ad.verify(0);
        }
    }
    if let Ok(ad) = SignedAd::from_bytes(data) {
        let _ = ad.verify(u64::MAX / 2);
    }
});
