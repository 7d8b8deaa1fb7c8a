package membership

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// maxCacheBytes bounds the cache file: every record at its limit for the
// largest fleet policy allows would be far less.
const maxCacheBytes = 64 << 20

// SaveCache writes records to path atomically (a new file renamed over
// the old one), readable by root only: it names every node's key.
func SaveCache(path string, records []Record) error {
	data, err := json.Marshal(records)
	if err != nil {
		return fmt.Errorf("membership: cache: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("membership: cache: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".members-*")
	if err != nil {
		return fmt.Errorf("membership: cache: %w", err)
	}
	defer os.Remove(tmp.Name()) // after the rename, a no-op
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("membership: cache %s: %w", path, err)
	}
	return nil
}

// LoadCache reads the records SaveCache wrote; none, with no error, if
// there is no cache yet. A record that no longer converts (a newer pspd
// wrote it, or the file was edited) is dropped by Peers, like one from the
// store.
func LoadCache(path string) ([]Record, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("membership: cache: %w", err)
	}
	defer f.Close()
	var records []Record
	// A cache cut off at the limit fails to decode, like a corrupt one.
	if err := json.NewDecoder(io.LimitReader(f, maxCacheBytes)).Decode(&records); err != nil {
		return nil, fmt.Errorf("membership: cache %s: %w (remove it to start from the membership service alone)", path, err)
	}
	return records, nil
}
