//! Region calendars: working days, holidays and reception hours (SH-3.3), for deadlines counted in working time.
