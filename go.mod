module github.com/pspd/pspd

go 1.26
