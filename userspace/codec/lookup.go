package codec

// HasRX reports whether the codec has a live receive SA with spi. It reads
// the SA table with one atomic load and counts nothing, so an engine can
// ask several peers' codecs which one a packet may belong to before
// opening it with one.
func (c *Codec) HasRX(spi uint32) bool {
	for _, r := range c.tab.Load().rx {
		if uint32(r.spi) == spi {
			return !r.off.Load()
		}
	}
	return false
}

// AppendRXSPIs appends the SPIs of the codec's live receive SAs to dst.
func (c *Codec) AppendRXSPIs(dst []uint32) []uint32 {
	for _, r := range c.tab.Load().rx {
		if !r.off.Load() {
			dst = append(dst, uint32(r.spi))
		}
	}
	return dst
}
