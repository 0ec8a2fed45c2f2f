//! Envelope decoding and validation: any bytes off the bus decode or fail
//! cleanly, and whatever decodes is accepted or refused with an error by
//! the same validation `Submit` runs, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use refbus_proto::v1::Envelope;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = Envelope::decode(data) {
        let sender = envelope.sender.clone();
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
