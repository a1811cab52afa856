//! Number formats, bit-exact and `core`-only (the emulator's conversions; the GPU uses its
//! `cvt` instructions, which these match).

/// bf16 bits to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 to bf16 bits, round to nearest even; every NaN becomes `0x7FFF`.
#[inline(always)]
pub fn f32_to_bf16(f: f32) -> u16 {
    if f.is_nan() {
        return 0x7FFF;
    }
    let u = f.to_bits();
    (u.wrapping_add(0x7FFF + ((u >> 16) & 1)) >> 16) as u16
}

/// Adds the 8 bf16 values packed in `words` (low half first) to `acc`, in f32.
#[inline(always)]
pub fn add_bf16x8(acc: &mut [f32; 8], words: [u32; 4]) {
    for i in 0..8 {
        acc[i] += bf16_to_f32((words[i / 2] >> (16 * (i % 2))) as u16);
    }
}

/// `acc` rounded to bf16, two values per word (low half first).
#[inline(always)]
pub fn pack_bf16x8(acc: &[f32; 8]) -> [u32; 4] {
    let mut out = [0u32; 4];
    for i in 0..8 {
        out[i / 2] |= (f32_to_bf16(acc[i]) as u32) << (16 * (i % 2));
    }
    out
}

/// Shifts `m` right by `shift` bits, rounding to nearest, ties to even.
#[inline(always)]
fn shift_round_even(m: u32, shift: u32) -> u32 {
    if shift == 0 {
        return m;
    }
    if shift > 31 {
        return 0;
    }
    let (r, rem, half) = (m >> shift, m & ((1 << shift) - 1), 1 << (shift - 1));
    if rem > half || (rem == half && r & 1 == 1) { r + 1 } else { r }
}

/// f32 to fp8 e4m3 ("fn": max 448, `0x7F` = NaN) bits: nearest even, saturating to ±448, as
/// `cvt.rn.satfinite.e4m3x2.f32`.
#[inline(always)]
pub fn f32_to_e4m3(f: f32) -> u8 {
    if f.is_nan() {
        return 0x7F;
    }
    let b = f.to_bits();
    let sign = ((b >> 24) & 0x80) as u8;
    let a = b & 0x7FFF_FFFF;
    if a >= 448f32.to_bits() {
        return sign | 0x7E;
    }
    let exp = (a >> 23) as i32 - 127;
    let m24 = (a & 0x7F_FFFF) | if a >> 23 != 0 { 0x80_0000 } else { 0 };
    let code = if exp < -6 {
        // Subnormal: units of 2^-9 (value = m24 * 2^(exp - 23)); 8 becomes the smallest normal.
        shift_round_even(m24, (14 - exp) as u32)
    } else {
        // Normal: 3 mantissa bits; a carry rolls into the exponent field.
        (((exp + 7) as u32) << 3) + shift_round_even(a & 0x7F_FFFF, 20)
    };
    sign | (code.min(0x7E) as u8)
}
