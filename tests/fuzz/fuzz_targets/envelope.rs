//! Envelope decoding, signature check and validation: any bytes off the
//! bus decode or fail cleanly, and whatever decodes is accepted or refused with an error by
//! the same validation `Submit` runs, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use refbus_proto::v1::Envelope;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = Envelope::decode(data) {
        let sender = envelope.sender.clone();
        // The signature check every inbox runs, with the first bytes as a
        // would-be signature header.
        let header = std::str::from_utf8(&data[..data.len().min(88)]).ok();
        let _ = refbus_core::signing::verify(
            refbus_fuzz::shipped_directory(),
            &sender,
            refbus_core::signing::Signed::Envelope,
            data,
            header,
        );
        let _ = refbus_core::envelope::tracking_id(&envelope);
        let _ = refbus_core::envelope::accept(
            envelope,
            refbus_fuzz::shipped_directory(),
            |id| id == sender,
            "fuzz",
            chrono::Utc::now(),
        );
    }
});
